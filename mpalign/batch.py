"""The training batch contract between the dataset (``mpalign.data``) and the model (``mpalign.models``).

A batch is a dict of torch tensors; B is the batch size, S = ``model.max_subjects`` (padded; ``subject_mask`` says
which subjects are real). Every frozen-encoder output has a cached key and a raw key: the dataset stores the cached
one when ``data.cache_*`` is on, otherwise training computes it from the raw key with ``mpalign.encoders``.

| key | shape | dtype | meaning |
|---|---|---|---|
| ``latents`` | (B, 4, h, w) | float | cached: scaled VAE latents of the target (posterior mean) |
| ``latents_std`` | (B, 4, h, w) | float | cached: scaled standard deviation of that posterior (``train.vae_latents=sample``) |
| ``pixel_values`` | (B, 3, H, W) | float | raw: target image in [-1, 1] |
| ``prompt_embeds`` | (B, 77, D_text) | float | cached: SDXL text conditioning (both encoders' penultimate states) |
| ``pooled_prompt_embeds`` | (B, P) | float | cached: text_encoder_2 projected pooled output |
| ``input_ids``, ``input_ids_2`` | (B, 77) | long | raw: token ids for the two tokenizers |
| ``phrase_embeds`` | (B, S, D_te1) | float | cached: pooled text_encoder output per subject phrase |
| ``phrase_input_ids`` | (B, S, 77) | long | raw: tokenizer ids per phrase |
| ``clip_hidden`` | (B, S, T, D_clip) | float | cached: CLIP image encoder penultimate states per reference crop |
| ``reference_pixels`` | (B, S, 3, R, R) | float | raw: reference crops in [0, 1] (processors take them from there) |
| ``boxes`` | (B, S, 4) | float | target boxes x0, y0, x1, y1 in [0, 1]; all-zero for padding |
| ``subject_mask`` | (B, S) | bool | True for real subjects |
| ``dino_cls`` | (B, S, D_dino) | float | DINOv2 CLS of each reference crop (alignment target of L_cross) |
| ``dino_patch_pooled`` | (B, D_dino) | float | mean DINOv2 patch token of the target image (target of L_self) |
| ``dino_ref_patch_pooled`` | (B, S, D_dino) | float | mean DINOv2 patch token of each reference crop (L_self option) |
| ``dino_ref_image_patch_pooled`` | (B, D_dino) | float | mean DINOv2 patch token of the whole reference frame (L_self default) |
| ``time_ids`` | (B, 6) | float | SDXL micro-conditioning: original (h, w), crop (top, left), target (h, w) |
"""

CACHED_KEYS = ("latents", "latents_std", "prompt_embeds", "pooled_prompt_embeds", "phrase_embeds", "clip_hidden")
RAW_KEYS = ("pixel_values", "input_ids", "input_ids_2", "phrase_input_ids", "reference_pixels")
ALWAYS_KEYS = ("boxes", "subject_mask", "dino_cls", "dino_patch_pooled", "dino_ref_patch_pooled",
               "dino_ref_image_patch_pooled", "time_ids")
