"""Face data preparation pieces: crops, masks, face parsing, detectors and the prepared folder's writer."""
