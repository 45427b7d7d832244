"""Tools and environments the agent tests name in recipes by import string (tests/ is on the path under pytest)."""

import time


def add(a: int, b: int) -> int:
    """Add two integers.

    Args:
        a: the first
        b: the second
    """
    return a + b


def no_docstring(a: int) -> int:
    return a


def no_hints(a):
    """Echo.

    Args:
        a: anything
    """
    return a


class NoReset:
    def act(self) -> str:
        """Act."""
        return "ok"


class Misbehaving:
    """An environment whose one tool misbehaves the way the row's reference answer says: raise, hang, huge (10 MB),
    print, garbage (a value that is not JSON), or ok. The reward is 1 for an episode whose tool answered."""

    def reset(self, answer: str = "ok", **_):
        self.mode, self.answered = answer.strip(), False

    def act(self) -> str:
        """Do the task's one action."""
        if self.mode == "raise":
            raise RuntimeError("boom")
        if self.mode == "hang":
            time.sleep(3600)
        if self.mode == "huge":
            return "x" * 10_000_000
        if self.mode == "print":
            print("debug output from a tool")
        if self.mode == "garbage":
            return object()
        self.answered = True
        return "done"

    def get_reward(self) -> float:
        return 1.0 if self.answered else 0.0
