"""The KMS core: keys, versions, aliases, tags, instances, the capability and state tables,
the ciphertext blob and the audit trail. It never imports aiohttp, pkcs11 or wire models."""
