"""The fold: events into time series, trending pages, new pages and spike alerts, exactly once."""
