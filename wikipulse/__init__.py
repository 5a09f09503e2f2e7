"""wikipulse: the live pulse of the Wikimedia wikis, through Redis."""

__version__ = "0.1.0"
