"""The archive: file store, SQL index, query matching and the durable work tables."""
