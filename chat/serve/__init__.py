"""오로라 as a service (`python -m chat.serve`): an OpenAI-compatible streaming API over one shared model, the
memory per user in SQLite (chat.memory_db), and a chat page.

    cli.py         flags, loading, uvicorn
    app.py         the Starlette routes: chat completions (plain / SSE), models, memory, health, the page
    openai_api.py  OpenAI's wire format: request validation, error objects, responses and chunks
    engine.py      the engine interface the app talks to (submit -> async job), and the engines
    page/          the static chat page (no build step, no CDN)
"""
