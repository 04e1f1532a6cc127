"""PCI: one root bus (bus 0) behind a host bridge, configured through ports 0xCF8/0xCFC and ECAM."""
