"""HTTP gateways: the Open Inference Protocol in processes of their own, clients of the supervisor."""
