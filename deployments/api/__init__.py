"""HTTP APIs of the ingress: OpenAI-compatible and TensorFlow-Serving-style routes."""
