"""The inference core: every path that scores or writes text goes through it.

loaded      LoadedModel: a model ready for inference and how text is read with it
scoring     the one scorer (per-token log-probabilities by one windowing rule) and evaluation of streams
decoding    the one decoding loop (SequenceDecoder, steppers, decode, stop strings through text.StopFilter)
sampling    greedy, temperature, top-k, top-p, repetition penalty
text        detokenizing, stop strings, prompts
seq2seq     batched greedy decoding, beam search and corpus translation for encoder-decoders
evaluate    held-out loss, perplexity and BLEU
"""
