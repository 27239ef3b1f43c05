"""The Alibaba Cloud KMS OpenAPI edge."""
