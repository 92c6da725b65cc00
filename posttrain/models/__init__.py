"""Model loading: `tiny://` presets built locally, or any Hugging Face id / local folder."""
