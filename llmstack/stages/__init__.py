"""One module per recipe stage kind, each `run(ctx: StageContext) -> StageResult`; the pipeline finds them by kind."""
