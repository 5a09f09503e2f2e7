"""The dashboard: the Dash page, its push to every open page, the History view and the operators' endpoints."""
