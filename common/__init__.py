"""Small helpers every package may import; they import nothing of stillroom's."""
