"""Retrieval for self-trained models: kNN-LM datastores and BM25 passage retrieval.

    lmzoo.retrieval.knn        datastore of (hidden state -> next token) with a FAISS index (`lmzoo index`)
    lmzoo.retrieval.interpolate  p = (1 - lambda) p_LM + lambda p_kNN as a model wrapper, `run.with_knn(...)`
    lmzoo.retrieval.knn_eval   held-out loss with a store; lambda and T tuned on half the text (`eval --knn`)
    lmzoo.retrieval.bm25       passages of a folder of .txt/.md files, searched with bm25s (`lmzoo rag index`)
    lmzoo.retrieval.rag        passages before the prompt, and held-out loss with / without them

Importing this package imports neither faiss nor bm25s (nor torch): the modules do, when used. They
come with the `retrieval` extra; without it, using them is one error line that says what to install.
"""

MISSING = "retrieval needs the {} package: pip install 'lmzoo[retrieval]' (faiss-cpu, bm25s)"
