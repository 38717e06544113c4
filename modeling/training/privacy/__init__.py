"""Differential-privacy training (DP-SGD through Opacus, MoE experts included): issue 16. Nothing here yet."""
