"""maskwatch: face-mask detection you can train, track, serve and run in real time."""

__version__ = "0.2.0"
