"""Loss functions: pure tensor math, importable with torch alone."""
