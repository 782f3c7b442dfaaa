"""A served volume's data path, independent of nbdkit and of any header layout:
sector crypto with partial-sector read-modify-write under range locks (:mod:`.volume`),
the queueing layer with dm-crypt's workqueue flags (:mod:`.queueing`), its crypt
workers (:mod:`.workers`), throttle (:mod:`.throttle`) and statistics (:mod:`.stats`).
Formats build their volumes from these pieces; the plugin serves them."""
