-- Argo CD health of a kubetune FineTuneJob: the value of
-- resource.customizations.health.kubetune.io_FineTuneJob in argocd-cm (see README.md here).
-- It decides on status.phase, status.observedGeneration and the Stalled condition only (kstatus);
-- reasons are shown in messages, never decided on: they grow as the operator learns new ways a job
-- can fail or wait.
local hs = {}
local status = obj.status

if status == nil or status.phase == nil then
  hs.status = "Progressing"
  hs.message = "Waiting for the kubetune operator to pick the job up"
  return hs
end

-- A status written for an older spec says nothing about the current one.
local generation = obj.metadata ~= nil and obj.metadata.generation or nil
if generation ~= nil and status.observedGeneration ~= nil and status.observedGeneration < generation then
  hs.status = "Progressing"
  hs.message = "Waiting for the kubetune operator to observe generation " .. tostring(generation)
  return hs
end

local stalled = nil
if status.conditions ~= nil then
  for _, condition in ipairs(status.conditions) do
    if condition.type == "Stalled" and condition.status == "True" then
      stalled = condition
    end
  end
end

local phase = status.phase
local message = status.message
if message == nil or message == "" then
  message = phase
end

if phase == "Succeeded" then
  hs.status = "Healthy"
  hs.message = message
elseif phase == "Failed" then
  hs.status = "Degraded"
  hs.message = message
elseif stalled ~= nil then
  -- e.g. pods that cannot be scheduled or pulled: waiting longer will not help
  hs.status = "Degraded"
  hs.message = (stalled.reason or "Stalled") .. ": " .. (stalled.message or message)
elseif phase == "Suspended" then
  hs.status = "Suspended"
  hs.message = message
elseif phase == "Running" then
  hs.status = "Progressing"
  if status.progress ~= nil and status.progress.summary ~= nil then
    hs.message = "Running: " .. status.progress.summary
  else
    hs.message = message
  end
elseif phase == "Pending" or phase == "Restarting" then
  hs.status = "Progressing"
  hs.message = message
else
  hs.status = "Unknown"
  hs.message = "Unknown phase " .. tostring(phase)
end
return hs
