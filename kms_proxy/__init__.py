"""The KMS front: an Alibaba-compatible KMS API over external key managers."""
