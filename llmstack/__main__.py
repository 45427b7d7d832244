from llmstack.cli import main

main()
