"""Graph passes of fxcompress, one per file; installed as ``fxcompress.passes``."""

__all__: list[str] = []
