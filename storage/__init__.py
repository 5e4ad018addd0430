"""Object storage (storage.objects) and database (storage.db) behind small interfaces."""
