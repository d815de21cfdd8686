"""The public proxy: a Falcon ASGI app run by gunicorn with uvicorn workers."""
