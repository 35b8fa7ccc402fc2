"""Integer rounding shared by every layer (imports nothing of ours, so anything may import it)."""


def round_up(n: int, multiple: int) -> int:
    """The smallest multiple of `multiple` that is >= n."""
    return -(-n // multiple) * multiple
