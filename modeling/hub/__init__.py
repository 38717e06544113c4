"""Sharing: Hub-ready folders, model-card metadata, push: issue 19. Nothing here yet."""
