"""Interoperability with transformers' own architectures: conversion from and to Mixtral, Qwen3-MoE and Mistral."""

from .conversion import config_from_transformers, config_to_transformers, from_transformers, to_transformers

__all__ = ["config_from_transformers", "config_to_transformers", "from_transformers", "to_transformers"]
