"""What every stage shares and none owns: settings, errors, the event's validation, summary and page."""
