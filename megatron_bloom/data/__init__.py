"""What training and evaluation read: tokenizers, documents, token datasets."""
