"""Safety filter (rules engine + classifier) and red-team suite: issue 15. Nothing here yet."""
