"""Local stand-ins for development and tests: an EventStreams server, a feed simulator, a redis-server child."""
