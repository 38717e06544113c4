"""Knowledge retrieval beside the decoder (kNN-LM datastore, retrieved context): issue 18. Nothing here yet."""
