--- tamarco.core.secrets: credentials inside URLs, hidden wherever text is shown.
--
-- A URL may carry a password in its user info (`amqp://user:PW@host/vhost`,
-- `redis://:PW@host:6379/0`, `https://TOKEN@host`). Log records, error
-- messages and /status show such a URL with the secret part replaced:
-- `amqp://user:***@host/vhost`, `redis://:***@host:6379/0`,
-- `https://***@host`. (Values under secret-sounding keys are masked as a
-- whole by tamarco.core.logging.)
local secrets = {}

secrets.MASK = "***"

-- scheme "://" user-info "@": the user info stops at the first "/", "?",
-- "#" or blank (the host part); it may itself contain "@" (greedy: the last
-- one before the host is the separator)
local URL_USERINFO = "(%a[%w+.%-]*://)([^/?#%s]+)@"

local function mask_userinfo(scheme, userinfo)
    local user = userinfo:match("^([^:]*):")
    if user then return scheme .. user .. ":" .. secrets.MASK .. "@" end
    return scheme .. secrets.MASK .. "@"
end

--- secrets.mask_urls(text) -> text with every URL's credentials masked
-- (text itself when it holds none; non-strings are returned unchanged).
function secrets.mask_urls(text)
    if type(text) ~= "string" or not text:find("://", 1, true) then return text end
    return (text:gsub(URL_USERINFO, mask_userinfo))
end

return secrets
