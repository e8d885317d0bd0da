"""The web UI (`multifusion ui`, the optional `ui` extra): `forms` holds what it shows without
Gradio (widgets from params models, recipe <-> form, errors routed to their field, the region
canvas); `app` lays it out in Gradio over the typed API."""
