"""Everything learned, one folder per concern:

    retrieval.py   `RetrievalModel`, the one surface the service uses
    types.py       one image's region record, extractor to reranker (numpy only; `index` imports it)
    files.py       the one atomic file writer (standard library only; `index` imports it too)
    devices.py     the one device resolver ("auto", "cpu", "cuda:N")
    architecture/  the network and its scorer: encoders, CAMP, precompute split, heads, fusion
    text/          tokenization, vocabulary, MiniLM, the text-encoder registry, GloVe vectors
    vision/        image decoding, region extractors, batch extraction
    checkpoints/   the checkpoint format and architecture configs (JSON in configs/)
    eval/          the evaluation protocol and the runs that score a model on a split
    training/      training only; nothing on the inference path imports it
    configs/, weights/  data: architecture and training presets, the shipped checkpoint

`model` never imports `index` or `service`; it hands them plain numpy arrays and ids.
Keep this file and the subpackages' free of heavy imports so that light modules (types,
tokenizer) load fast.
"""
