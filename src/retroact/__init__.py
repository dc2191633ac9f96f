"""RetroAct."""
