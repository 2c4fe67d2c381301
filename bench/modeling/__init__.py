"""Model parts: image and text towers, decoders, losses, masking and the entity lexicon, prompts written from
labels, the `Method` contract every method plug-in fulfils, the fine-tuning model, external CLIP models."""
