-- What a node knows of one Redis's sequence of events: its epoch (a new epoch means Redis lost
-- its data), the newest position (timestamp, seq) seen in a reply or a message, and the floor
-- under the next timestamps (every timestamp this node handed out is below it).
local core = require "longpoll.core"

local Position = {}
Position.__index = Position

local M = {}

-- log(level, message, fields): where a change of epoch is reported; on_new_epoch(): called
-- when Redis turns out to have lost its data (optional); on_floor(floor): called when the floor
-- rose (optional: the C publisher's copy follows it).
function M.new(log, on_new_epoch, on_floor)
  return setmetatable({ epoch = nil, ts = 0, seq = 0, floor = 0, old_epochs = {}, log = log,
    on_new_epoch = on_new_epoch, on_floor = on_floor }, Position)
end

local function raise(self, floor)
  self.floor = floor
  if self.on_floor then self.on_floor(floor) end
end

-- Notes a position Redis reported (an event, a read, a mark).
function Position:observe(epoch, ts, seq)
  if epoch ~= self.epoch then
    -- a late message of the old epoch must not switch back to it
    if self.old_epochs[epoch] then return end
    if self.epoch then
      self.log("warn", "Redis has a new epoch: it lost its data", { epoch = epoch })
      self.old_epochs[self.epoch] = true
      if self.on_new_epoch then self.on_new_epoch() end
    end
    self.epoch, self.ts, self.seq = epoch, ts, seq
  elseif ts > self.ts or (ts == self.ts and seq > self.seq) then
    self.ts, self.seq = ts, seq
  end
  if ts > self.floor then raise(self, ts) end
end

-- Notes a timestamp T handed out for a timeout answer: later events get more.
function Position:handed_out(T)
  if T + 1 > self.floor then raise(self, T + 1) end
end

-- The largest timestamp this node knows was issued (events or timeout answers).
function Position:known_time()
  return self.floor - 1 >= self.ts and self.floor - 1 or self.ts
end

-- The floor: the smallest timestamp the next event may get.
function Position:current_floor()
  return self.floor
end

-- The floor as a script argument.
function Position:floor_arg()
  return ("%d"):format(self.floor)
end

-- A cursor at the newest position: what comes later is new.
function Position:cursor()
  return { epoch = self.epoch, ts = self.ts, seq = self.seq }
end

-- A random epoch for Redis to adopt when its clock hash is missing (the scripts' last argument).
function M.epoch_candidate()
  return (core.uuid():gsub("-", ""):sub(1, 16))
end

-- Whether an event (epoch, ts, seq) comes after cursor. Positions compare as stream entry IDs
-- do, (timestamp, seq): the same as seq alone in one master's history, and still right after a
-- failover to a replica that lacked the newest events (its next events reuse their seqs, with
-- later timestamps).
function M.after(cursor, ev)
  return ev.epoch ~= cursor.epoch or ev.ts > cursor.ts or (ev.ts == cursor.ts and ev.seq > cursor.seq)
end

return M
