"""The OpenAI-compatible routes, one router per concern; :func:`loratui.serving.app.create_app` wires them."""
