"""The HTTP face: the app, its routes, schemas, dependencies, upload limits, auth, rate limits,
request metrics and the one map from errors to problem+json. Nothing outside it imports it
except the command line that serves it."""
