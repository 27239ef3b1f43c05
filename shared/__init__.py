"""What the KMS front and the EKM simulator both import.

Modules: ``xks`` (XKS wire models, error names, AAD/CDIV), ``sigv4`` (verify and sign),
``pkcs11pool`` (PKCS#11 sessions and error mapping), ``tls`` (SSL contexts),
``certs`` (development certificates).
"""
