"""Training past one machine (FSDP2, ZeRO-3, TP / EP / PP plans through existing engines): issue 17; empty so far."""
