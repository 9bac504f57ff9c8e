"""The local sandbox's published credentials and signing secrets, and its port.

Public on purpose: in sandbox mode (CDP_SANDBOX=1) a credential or signing secret left unset
takes the sandbox's own, so `make demo` needs no configuration. Nothing here is a real secret.
Imports nothing, so the sandbox, the settings and the connectors can all read it.
"""

SANDBOX_META_TOKEN = "sandbox-meta-token"
SANDBOX_TWILIO_ACCOUNT_SID = "AC00000000000000000000000000000000"
SANDBOX_TWILIO_AUTH_TOKEN = "sandbox-twilio-token"
SANDBOX_INFOBIP_API_KEY = "sandbox-infobip-key"
SANDBOX_VONAGE_API_KEY = "sandboxkey"
SANDBOX_VONAGE_API_SECRET = "sandbox-vonage-secret"
SANDBOX_WEBHOOK_TOKEN = "sandbox-webhook-token"
SANDBOX_BRAZE_API_KEY = "sandbox-braze-rest-key"
SANDBOX_LINE_TOKEN = "sandbox-line-channel-token"
SANDBOX_WECHAT_APP_ID = "wxsandbox0000000001"
SANDBOX_WECHAT_APP_SECRET = "sandbox-wechat-app-secret"
# What the sandbox signs its status webhooks with (each provider's own scheme).
SANDBOX_META_APP_SECRET = "sandbox-meta-app-secret"
SANDBOX_META_VERIFY_TOKEN = "sandbox-meta-verify-token"
SANDBOX_INFOBIP_WEBHOOK_CREDENTIALS = "infobip:sandbox-webhook-password"
SANDBOX_VONAGE_SIGNATURE_SECRET = "sandbox-vonage-signature-secret-0123456789"
SANDBOX_LINE_CHANNEL_SECRET = "sandbox-line-channel-secret"
SANDBOX_STATUS_SECRET = "sandbox-status-secret"
SANDBOX_PII_HASH_KEY = "sandbox-pii-hash-key"
SANDBOX_PORT = 8787
SANDBOX_SLACK_TOKEN = "xoxb-sandbox-alerts"  # alerts to the sandbox's Slack-shaped API
