"""`streamer serve`: the web console and REST API (FastAPI on uvicorn) beside the pipeline, auth on by default.

app.py builds the FastAPI app from a ServeContext; server.py runs it in a thread beside the Supervisor.
Nothing here imports FastAPI at package import, so `import streamer` stays light.
"""
