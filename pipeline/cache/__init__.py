"""The local content-addressed cache: entries, decoded-image packs, remembered file hashes."""
