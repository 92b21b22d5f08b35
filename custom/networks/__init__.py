"""Networks and weights: Swin UNETR options, pretrained-encoder loading, the recipe saved with the weights, runtimes."""
