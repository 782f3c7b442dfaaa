"""Where ciphertext lives: a local file (:class:`~.store.FileStore`) or an NBD server
(:class:`~.store.NbdStore`), opened by :func:`~.store.open_store`, with QEMU-compatible
image locks (:mod:`.locking`).  Stores know bytes and offsets, nothing of formats or keys;
:class:`~.store.Store` is the contract both keep."""
