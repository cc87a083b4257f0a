"""Data: corpora written as MDS shards (shapes), the CLIP tokenizer, image transforms, the Streaming loader."""
