"""Tessera device agent: token-held key, EST enrollment, mTLS MQTT session, renewal."""
