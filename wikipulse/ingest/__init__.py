"""Ingest: the EventStreams feed read, validated and written to Redis; the router to shards; the routes."""
