"""The ingress replica's own code, in its process: the Serve deployment that takes every HTTP and
Python call (ingress), the result cache in front of the model, the model cards it keys on, and
waiting for Serve to place a call on a model replica (assignment). Its HTTP routes and
schemas are deployments/api; the request router that picks a replica is deployments/routing.py,
named by import path in the app's config."""
