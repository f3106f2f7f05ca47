"""The app layer: the chat CLI (`python -m chat`), the `[key: value]` memory store (`python -m chat.memory`) and
export. The only package that may use both train/ (the generator) and sbert/ (the memory's encoder)."""
